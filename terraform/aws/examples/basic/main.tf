# End-to-end example: a KV-cache bucket for one vLLM deployment, with the
# access policy attached to the role the inference nodes run as.

terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40.0, < 7.0.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region for the cache bucket; keep it next to the GPU nodes."
  type        = string
  default     = "us-west-2"
}

variable "bucket_name" {
  description = "Globally unique name for the cache bucket."
  type        = string
}

variable "inference_role_name" {
  description = "IAM role of the inference nodes (instance profile or IRSA role). Null leaves attaching to you."
  type        = string
  default     = null
}

module "kv_cache" {
  source = "../.."

  bucket_name         = var.bucket_name
  prefix              = "vua"
  ttl_days            = 7
  attach_to_role_name = var.inference_role_name

  tags = {
    app = "vua-s3"
  }
}

output "url" {
  description = "Paste into the vua_s3 / vLLM config."
  value       = module.kv_cache.url
}

output "policy_arn" {
  description = "Attach to other roles that need the cache."
  value       = module.kv_cache.policy_arn
}

output "refresh_after" {
  description = "Seconds for VUA(..., refresh_after=...): reads re-stamp what they read, so fragments expire by last use."
  value       = module.kv_cache.refresh_after
}

output "vllm_kv_transfer_config" {
  description = "Value for vllm serve --kv-transfer-config."
  value       = module.kv_cache.vllm_kv_transfer_config
}
