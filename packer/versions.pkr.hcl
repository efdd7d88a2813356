# For packer >= 1.7 only, where the DigitalOcean builder is a plugin:
#   packer init packer/ && packer build packer/
# Debian's packer 1.6.6 has the builder built in and rejects this block, so
# with it run `packer build packer/edge.pkr.hcl` (the file, not the
# directory). See docs/edge-image.md.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    digitalocean = {
      version = ">= 1.4.0"
      source  = "github.com/digitalocean/digitalocean"
    }
  }
}
