# Policy documents for the cache bucket.
#
# This file only defines locals built from variables and the provider-derived
# locals in main.tf (partition, dns_suffix, region). The offline tests copy it
# next to variables.tf, stub those three locals, and let `terraform console`
# render the JSON exactly as `terraform apply` would send it.

locals {
  key_prefix      = "${var.prefix}/"
  bucket_arn      = "arn:${local.partition}:s3:::${var.bucket_name}"
  fragments_arn   = "${local.bucket_arn}/${var.prefix}/*"
  iam_policy_name = coalesce(var.iam_policy_name, "${var.bucket_name}-vua-s3")

  bucket_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
        Condition = {
          Bool = { "aws:SecureTransport" = "false" }
        }
      },
      {
        Sid       = "DenyTLSOlderThan12"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
        Condition = {
          NumericLessThan = { "s3:TlsVersion" = "1.2" }
        }
      },
    ]
  }

  # What an inference node needs: GetObject (also authorizes HeadObject),
  # PutObject (also authorizes Create/UploadPart/CompleteMultipartUpload),
  # cleanup of its own failed uploads, and listing below the prefix only.
  inference_statements = [
    {
      Sid      = "ListCachePrefix"
      Effect   = "Allow"
      Action   = ["s3:ListBucket"]
      Resource = [local.bucket_arn]
      Condition = {
        StringLike = { "s3:prefix" = ["${var.prefix}/*"] }
      }
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
  ]

  # For `vua_s3 gc` / `vua_s3 doctor`. ListBucketMultipartUploads has no
  # prefix condition key in S3, so it is granted on the (dedicated) bucket.
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

  # SSE-KMS: the key may be used only by S3 on the node's behalf.
  kms_statements = [
    {
      Sid      = "UseCacheKmsKeyThroughS3"
      Effect   = "Allow"
      Action   = ["kms:Decrypt", "kms:GenerateDataKey"]
      Resource = [var.kms_key_arn]
      Condition = {
        StringEquals = { "kms:ViaService" = "s3.${local.region}.${local.dns_suffix}" }
      }
    },
  ]

  inference_policy = {
    Version = "2012-10-17"
    Statement = concat(
      local.inference_statements,
      [for s in local.maintenance_statements : s if var.allow_maintenance],
      [for s in local.kms_statements : s if var.kms_key_arn != null],
    )
  }

  bucket_policy_json    = jsonencode(local.bucket_policy)
  inference_policy_json = jsonencode(local.inference_policy)

  # Expiry by use (docs/operations.md): readers re-stamp what they read once it is
  # refresh_after old, so the lifecycle rule's ttl_days counts from the last use. The
  # outputs carry the value, so what the readers run with pairs with the rule.
  refresh_after_hours   = coalesce(var.refresh_after_hours, var.ttl_days * 3)
  refresh_after_seconds = local.refresh_after_hours == 0 ? null : local.refresh_after_hours * 3600
  refresh_pairing_ok    = local.refresh_after_hours * 4 <= var.ttl_days * 24
  vua_options           = local.refresh_after_seconds == null ? {} : { refresh_after = local.refresh_after_seconds }
}
