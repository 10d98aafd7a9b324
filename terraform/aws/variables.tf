variable "bucket_name" {
  description = "Name of the S3 bucket that holds the KV-cache fragments. The module creates it; it should be dedicated to the cache."
  type        = string

  validation {
    condition     = length(var.bucket_name) >= 3 && length(var.bucket_name) <= 63
    error_message = "bucket_name must be 3 to 63 characters long."
  }

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]*[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name may contain only lowercase letters, digits and hyphens, and must start and end with a letter or digit. Dots are rejected on purpose: they break TLS for virtual-hosted-style requests."
  }

  validation {
    condition     = !startswith(var.bucket_name, "xn--") && !startswith(var.bucket_name, "sthree-") && !endswith(var.bucket_name, "-s3alias") && !endswith(var.bucket_name, "--ol-s3") && !endswith(var.bucket_name, "--x-s3")
    error_message = "bucket_name uses a prefix or suffix that S3 reserves (xn--, sthree-, -s3alias, --ol-s3, --x-s3)."
  }
}

variable "prefix" {
  description = "Key prefix for the cache inside the bucket, without leading or trailing slash (e.g. \"vua\" or \"kv/prod\"). Lifecycle rules and IAM grants are scoped to \"<prefix>/\"."
  type        = string
  default     = "vua"

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", var.prefix))
    error_message = "prefix must be non-empty, use only letters, digits, '.', '_', '-' and '/' separators, and have no leading, trailing or doubled slash."
  }
}

variable "ttl_days" {
  description = "Days after an object's last modification at which S3 expires cache fragments under the prefix: its last write, or its last use where readers refresh what they read (refresh_after_hours)."
  type        = number
  default     = 7

  validation {
    condition     = var.ttl_days > 0 && floor(var.ttl_days) == var.ttl_days
    error_message = "ttl_days must be a whole number greater than 0."
  }
}

variable "refresh_after_hours" {
  description = "Hours after which vua_s3 readers re-stamp the fragments they read (vua_s3's refresh_after), so ttl_days counts from an object's last use instead of its last write. Null: ttl_days x 3 hours (an eighth of ttl_days). 0: off, fragments expire by their last write. At most a quarter of ttl_days: an object is re-stamped up to twice refresh_after after its last re-stamp, so it expires between ttl_days - 2 x refresh_after and ttl_days after its last read."
  type        = number
  default     = null

  validation {
    condition     = var.refresh_after_hours == null || try(var.refresh_after_hours >= 0, false)
    error_message = "refresh_after_hours must be null (an eighth of ttl_days), 0 (off) or a positive number of hours."
  }
}

variable "abort_incomplete_multipart_days" {
  description = "Days after initiation at which S3 aborts multipart uploads that were never completed, freeing their parts."
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_days >= 1 && floor(var.abort_incomplete_multipart_days) == var.abort_incomplete_multipart_days
    error_message = "abort_incomplete_multipart_days must be a whole number of at least 1."
  }
}

variable "kms_key_arn" {
  description = "ARN of a KMS key for SSE-KMS. Leave null for SSE-S3 (AES256). When set, the inference policy also gets kms:Decrypt and kms:GenerateDataKey on this key, through S3 only."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:<partition>:kms:<region>:<account>:key/<id>); aliases cannot scope an IAM grant."
  }
}

variable "versioning_enabled" {
  description = "Turn on bucket versioning. Off by default: a cache needs no history. When on, noncurrent versions are still removed one day after they are replaced."
  type        = bool
  default     = false
}

variable "allow_maintenance" {
  description = "Also grant s3:DeleteObject under the prefix and s3:ListBucketMultipartUploads on the bucket, which the vua_s3 gc and doctor commands use. Inference nodes do not need them; lifecycle rules already expire data."
  type        = bool
  default     = false
}

variable "iam_policy_name" {
  description = "Name of the IAM policy for inference nodes. Defaults to \"<bucket_name>-vua-s3\"."
  type        = string
  default     = null

  validation {
    condition     = var.iam_policy_name == null || can(regex("^[A-Za-z0-9+=,.@_-]{1,128}$", var.iam_policy_name))
    error_message = "iam_policy_name must be 1 to 128 characters of letters, digits and +=,.@_-."
  }
}

variable "iam_policy_path" {
  description = "Path for the IAM policy."
  type        = string
  default     = "/"

  validation {
    condition     = can(regex("^/([A-Za-z0-9+=,.@_-]+/)*$", var.iam_policy_path))
    error_message = "iam_policy_path must begin and end with '/' (e.g. \"/\" or \"/vua/\")."
  }
}

variable "attach_to_role_name" {
  description = "Name (not ARN) of an existing IAM role, e.g. the inference nodes' instance or IRSA role, to attach the policy to. Null attaches nothing."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete the bucket even if it still holds cache objects."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags applied to the bucket and the IAM policy."
  type        = map(string)
  default     = {}
}
