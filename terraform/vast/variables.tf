variable "bucket_name" {
  description = "Name of the S3 bucket (VAST S3 view) that holds the KV-cache fragments. The module creates it."
  type        = string

  validation {
    condition     = length(var.bucket_name) >= 3 && length(var.bucket_name) <= 63
    error_message = "bucket_name must be 3 to 63 characters long."
  }

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]*[a-z0-9]$", var.bucket_name)) && !strcontains(var.bucket_name, "..")
    error_message = "bucket_name may contain only lowercase letters, digits, '-' and '.', must start and end with a letter or digit, and must not contain '..'."
  }

  validation {
    condition     = !can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$", var.bucket_name))
    error_message = "bucket_name must not look like an IP address."
  }
}

variable "prefix" {
  description = "Key prefix for the cache inside the bucket, without leading or trailing slash (e.g. \"vua\")."
  type        = string
  default     = "vua"

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", var.prefix))
    error_message = "prefix must be non-empty, use only letters, digits, '.', '_', '-' and '/' separators, and have no leading, trailing or doubled slash."
  }
}

variable "ttl_days" {
  description = "Days after an object's last modification at which the VAST lifecycle rule expires cache fragments under the prefix: its last write, or its last use where readers refresh what they read (refresh_after_hours)."
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
  description = "Days after initiation at which incomplete multipart uploads are aborted."
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_days >= 1 && floor(var.abort_incomplete_multipart_days) == var.abort_incomplete_multipart_days
    error_message = "abort_incomplete_multipart_days must be a whole number of at least 1."
  }
}

variable "endpoint" {
  description = "Where inference nodes reach the VAST S3 service: a DNS name that resolves to the protocol VIP pool, or one VIP address, optionally with :port. No scheme, no path."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$", var.endpoint)) || can(regex("^\\[[0-9A-Fa-f:]+\\](:[0-9]{1,5})?$", var.endpoint))
    error_message = "endpoint must be a host name or IP (IPv6 in brackets), optionally followed by :port, without scheme or path, e.g. \"s3.vast.example.com\"."
  }
}

variable "endpoint_scheme" {
  description = "Scheme of the S3 endpoint. Keep https unless the cluster serves S3 over plain HTTP only; with http the access keys' signatures and all data cross the network unencrypted."
  type        = string
  default     = "https"

  validation {
    condition     = contains(["https", "http"], var.endpoint_scheme)
    error_message = "endpoint_scheme must be \"https\" or \"http\"."
  }
}

variable "region" {
  description = "Region name the S3 clients sign with. VAST accepts any; us-east-1 is the usual choice."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z0-9-]+$", var.region))
    error_message = "region must be lowercase letters, digits and hyphens."
  }
}

variable "ca_bundle" {
  description = "Path, on the inference nodes, of a PEM bundle that signs the cluster's S3 certificate (for a private CA). Added to the URL as ca_bundle=. Null uses the system trust store."
  type        = string
  default     = null

  validation {
    condition     = var.ca_bundle == null || can(regex("^/[^\\s?&#%]+$", var.ca_bundle))
    error_message = "ca_bundle must be an absolute path without whitespace or the characters ?&#%."
  }
}

variable "tls_verify" {
  description = "Verify the endpoint's TLS certificate. Setting false adds verify=false to the URL; use only on a lab cluster, prefer ca_bundle."
  type        = bool
  default     = true
}

variable "tenant_name" {
  description = "VAST tenant that owns the view, the identity policy and the access key."
  type        = string
  default     = "default"
}

variable "view_policy_name" {
  description = "Existing view policy for the S3 view. VAST clusters ship one named s3_default_policy."
  type        = string
  default     = "s3_default_policy"
}

variable "view_path" {
  description = "Element Store path of the bucket view. Defaults to \"/<bucket_name>\"."
  type        = string
  default     = null

  validation {
    condition     = var.view_path == null || can(regex("^(/[^/]+)+$", var.view_path))
    error_message = "view_path must begin with '/' and must not end with '/'."
  }
}

variable "service_user_name" {
  description = "Name of the local VAST user whose S3 key the inference nodes use."
  type        = string
  default     = "vua-s3"

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]{1,64}$", var.service_user_name))
    error_message = "service_user_name must be 1 to 64 letters, digits, '.', '_' or '-'."
  }
}

variable "service_user_uid" {
  description = "UID of the local service user. Pick one that is unused on the cluster."
  type        = number

  validation {
    condition     = var.service_user_uid > 0 && floor(var.service_user_uid) == var.service_user_uid
    error_message = "service_user_uid must be a positive whole number."
  }
}

variable "bucket_owner" {
  description = "User name to own the bucket. Null makes the service user the owner. With another owner, the service user's access comes from the identity policy alone."
  type        = string
  default     = null
}

variable "s3_policy_name" {
  description = "Name of the S3 identity policy. Defaults to \"<bucket_name>-vua-s3\"."
  type        = string
  default     = null
}

variable "allow_maintenance" {
  description = "Also allow s3:DeleteObject under the prefix and s3:ListBucketMultipartUploads on the bucket, for the vua_s3 gc and doctor commands."
  type        = bool
  default     = false
}

variable "pgp_public_key" {
  description = "Optional PGP public key (ASCII-armored). When set, VAST returns the secret key encrypted with it (output encrypted_secret_access_key) instead of in plaintext."
  type        = string
  default     = null
}
