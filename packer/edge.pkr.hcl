# skerry's edge image on DigitalOcean: a droplet booted from Debian 12 gets
# the static edge-agent and images/provision.sh, then becomes a snapshot
# named skerry-edge-<version>, which `home-agent connect --edge droplet`
# finds by that name.
#
# Run from the repository root, after building the musl edge-agent:
#
#   cargo build --release --target x86_64-unknown-linux-musl -p edge-agent
#   export DIGITALOCEAN_TOKEN=...        # or DIGITALOCEAN_API_TOKEN
#   packer build packer/edge.pkr.hcl     # Debian's packer 1.6.6
#   packer init packer/ && packer build packer/   # packer >= 1.7
#
# This file uses only what Debian's packer 1.6.6 understands (CI runs
# `packer validate` on it); the plugin requirement of newer releases lives
# in versions.pkr.hcl. See docs/edge-image.md.

variable "do_token" {
  type        = string
  description = "DigitalOcean API token (read+write). Empty: DIGITALOCEAN_API_TOKEN is used."
  default     = env("DIGITALOCEAN_TOKEN")
  sensitive   = true
}

variable "version" {
  type        = string
  description = "skerry release; must match the home-agent that will use the image (home-agent --version)."
  default     = "0.1.0"
}

variable "region" {
  type        = string
  description = "Region of the build droplet, where the snapshot is made."
  default     = "fra1"
}

variable "snapshot_regions" {
  type        = list(string)
  description = "Further regions to copy the snapshot to (each copy is billed)."
  default     = []
}

variable "size" {
  type        = string
  description = "Size slug of the build droplet; the smallest one is enough."
  default     = "s-1vcpu-512mb-10gb"
}

variable "ssh" {
  type        = bool
  description = "Leave SSH on in the image (public keys only). Off by default: the edge needs no login."
  default     = false
}

variable "edge_agent" {
  type        = string
  description = "The static musl edge-agent to install."
  default     = "target/x86_64-unknown-linux-musl/release/edge-agent"
}

locals {
  snapshot_name = "skerry-edge-${var.version}"
}

source "digitalocean" "edge" {
  api_token        = var.do_token
  image            = "debian-12-x64"
  region           = var.region
  size             = var.size
  ssh_username     = "root"
  droplet_name     = "skerry-edge-build-${var.version}"
  snapshot_name    = local.snapshot_name
  snapshot_regions = concat([var.region], var.snapshot_regions)
  tags             = ["skerry", "skerry-image-build"]
  monitoring       = false
  ipv6             = false
  state_timeout    = "10m"
  snapshot_timeout = "30m"
}

build {
  sources = ["source.digitalocean.edge"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/skerry-images/sysctl.d"]
  }

  provisioner "file" {
    source      = var.edge_agent
    destination = "/tmp/skerry-images/edge-agent"
  }

  provisioner "file" {
    source      = "images/edge-agent.service"
    destination = "/tmp/skerry-images/edge-agent.service"
  }

  provisioner "file" {
    source      = "images/sysctl.d/90-skerry-edge.conf"
    destination = "/tmp/skerry-images/sysctl.d/90-skerry-edge.conf"
  }

  provisioner "shell" {
    script = "images/provision.sh"
    environment_vars = [
      "SKERRY_SRC=/tmp/skerry-images",
      "SKERRY_TARGET=droplet",
      "SKERRY_SSH=${var.ssh ? "1" : "0"}",
    ]
  }
}
