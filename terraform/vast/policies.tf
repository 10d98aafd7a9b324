# Documents and derived names for the VAST module.
#
# Only variables are referenced here, so the offline tests can copy this file
# next to variables.tf and let `terraform console` render it exactly as
# `terraform apply` would.

locals {
  key_prefix     = "${var.prefix}/"
  view_path      = coalesce(var.view_path, "/${var.bucket_name}")
  bucket_owner   = coalesce(var.bucket_owner, var.service_user_name)
  s3_policy_name = coalesce(var.s3_policy_name, "${var.bucket_name}-vua-s3")

  bucket_arn    = "arn:aws:s3:::${var.bucket_name}"
  fragments_arn = "${local.bucket_arn}/${var.prefix}/*"

  # VAST falls back to bucket and object ACLs for requests that no identity
  # policy covers, and the bucket owner's ACL is FULL_CONTROL. The explicit
  # deny keeps the service user from reconfiguring or deleting the bucket
  # even when it is the owner.
  s3_statements = [
    {
      Sid      = "ListCacheBucket"
      Effect   = "Allow"
      Action   = ["s3:ListBucket"]
      Resource = [local.bucket_arn]
    },
    {
      Sid    = "ReadWriteKVFragments"
      Effect = "Allow"
      Action = [
        "s3:GetObject",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
      ]
      Resource = [local.fragments_arn]
    },
    {
      Sid    = "DenyBucketAdministration"
      Effect = "Deny"
      Action = [
        "s3:DeleteBucket",
        "s3:DeleteBucketPolicy",
        "s3:PutBucketAcl",
        "s3:PutBucketPolicy",
        "s3:PutBucketVersioning",
        "s3:PutLifecycleConfiguration",
      ]
      Resource = [local.bucket_arn]
    },
  ]

  maintenance_statements = [
    {
      Sid      = "DeleteKVFragments"
      Effect   = "Allow"
      Action   = ["s3:DeleteObject"]
      Resource = [local.fragments_arn]
    },
    {
      Sid      = "ListIncompleteUploads"
      Effect   = "Allow"
      Action   = ["s3:ListBucketMultipartUploads"]
      Resource = [local.bucket_arn]
    },
  ]

  s3_policy = {
    Version = "2012-10-17"
    Statement = concat(
      local.s3_statements,
      [for s in local.maintenance_statements : s if var.allow_maintenance],
    )
  }
  s3_policy_json = jsonencode(local.s3_policy)

  # Client settings a VAST endpoint needs: path-style addressing (buckets are
  # not DNS sub-domains of the VIP pool name) and checksums only when the
  # operation requires them (newer AWS SDKs add them to every upload).
  endpoint_url = "${var.endpoint_scheme}://${var.endpoint}"
  vua_s3_settings = merge(
    {
      endpoint_url = local.endpoint_url
      addressing   = "path"
      checksum     = "when_required"
      region       = var.region
    },
    var.tls_verify ? {} : { verify = "false" },
    var.ca_bundle == null ? {} : { ca_bundle = var.ca_bundle },
  )
  # Fixed key order, so the URL is stable and readable.
  vua_s3_query = join("&", [
    for k in ["endpoint_url", "addressing", "checksum", "region", "verify", "ca_bundle"] :
    "${k}=${local.vua_s3_settings[k]}" if contains(keys(local.vua_s3_settings), k)
  ])
  bucket_url = "s3://${var.bucket_name}/${var.prefix}"
  vua_s3_url = "${local.bucket_url}?${local.vua_s3_query}"

  # Expiry by use (docs/operations.md): readers re-stamp what they read once it is
  # refresh_after old, so the lifecycle rule's ttl_days counts from the last use. The
  # outputs carry the value, so what the readers run with pairs with the rule.
  refresh_after_hours   = coalesce(var.refresh_after_hours, var.ttl_days * 3)
  refresh_after_seconds = local.refresh_after_hours == 0 ? null : local.refresh_after_hours * 3600
  refresh_pairing_ok    = local.refresh_after_hours * 4 <= var.ttl_days * 24
  vua_options           = local.refresh_after_seconds == null ? {} : { refresh_after = local.refresh_after_seconds }
}
