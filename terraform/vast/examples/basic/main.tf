# End-to-end example: a KV-cache bucket on a VAST cluster, a service user with
# its S3 key, and the vua_s3 URL with the settings VAST needs.

terraform {
  required_version = ">= 1.5.0"

  required_providers {
    vastdata = {
      source  = "vast-data/vastdata"
      version = "~> 2.0"
    }
  }
}

provider "vastdata" {
  host            = var.vms_host
  port            = 443
  username        = var.vms_username
  password        = var.vms_password
  skip_ssl_verify = false
}

variable "vms_host" {
  description = "VMS (management) address of the cluster."
  type        = string
}

variable "vms_username" {
  description = "VMS user allowed to manage views, users and identity policies."
  type        = string
}

variable "vms_password" {
  description = "Password of vms_username. Pass it with TF_VAR_vms_password, not on the command line."
  type        = string
  sensitive   = true
}

variable "s3_endpoint" {
  description = "DNS name of the protocols VIP pool that serves S3 to the inference nodes."
  type        = string
}

module "kv_cache" {
  source = "../.."

  bucket_name      = "vua-kv-cache"
  prefix           = "vua"
  ttl_days         = 3
  endpoint         = var.s3_endpoint
  service_user_uid = 7001
}

output "url" {
  description = "Paste into the vua_s3 / vLLM config."
  value       = module.kv_cache.url
}

output "access_key_id" {
  description = "AWS_ACCESS_KEY_ID for the inference nodes."
  value       = module.kv_cache.access_key_id
}

output "secret_access_key" {
  description = "AWS_SECRET_ACCESS_KEY for the inference nodes."
  value       = module.kv_cache.secret_access_key
  sensitive   = true
}

output "refresh_after" {
  description = "Seconds for VUA(..., refresh_after=...): reads re-stamp what they read, so fragments expire by last use."
  value       = module.kv_cache.refresh_after
}

output "vllm_kv_transfer_config" {
  description = "Value for vllm serve --kv-transfer-config."
  value       = module.kv_cache.vllm_kv_transfer_config
}
