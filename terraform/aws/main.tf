data "aws_partition" "current" {}

locals {
  # Values only the provider knows. policies.tf derives everything else from
  # these and from variables, so its documents can be rendered offline.
  partition  = data.aws_partition.current.partition
  dns_suffix = data.aws_partition.current.dns_suffix
  region     = aws_s3_bucket.cache.region
}

resource "aws_s3_bucket" "cache" {
  #checkov:skip=CKV_AWS_18:Server access logs of a regenerable cache add cost and a second bucket; CloudTrail data events or org-level logging are the place for audit.
  #checkov:skip=CKV_AWS_144:Cross-region replication of a cache is pointless: lost fragments are recomputed by the inference engine.
  #checkov:skip=CKV2_AWS_62:No consumer of object events exists for KV fragments.
  #checkov:skip=CKV_AWS_21:Versioning is off by default on purpose (var.versioning_enabled); a cache needs no history.
  #checkov:skip=CKV_AWS_145:SSE-S3 is the default by design; SSE-KMS is opt-in through var.kms_key_arn.
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = var.tags
}

resource "aws_s3_bucket_public_access_block" "cache" {
  bucket = aws_s3_bucket.cache.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "cache" {
  bucket = aws_s3_bucket.cache.id

  rule {
    # Disables ACLs: access is decided by IAM and the bucket policy alone.
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "cache" {
  bucket = aws_s3_bucket.cache.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    # S3 Bucket Keys cut KMS request costs; they do nothing for SSE-S3.
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_versioning" "cache" {
  # A new bucket is unversioned, so versioning is only managed when asked for.
  # Removing this resource later suspends versioning.
  count  = var.versioning_enabled ? 1 : 0
  bucket = aws_s3_bucket.cache.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "cache" {
  bucket = aws_s3_bucket.cache.id

  rule {
    id     = "expire-kv-fragments"
    status = "Enabled"

    filter {
      prefix = local.key_prefix
    }

    expiration {
      days = var.ttl_days
    }

    # Only matters when versioning is on: drop replaced versions quickly.
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    # Whole bucket: an interrupted upload anywhere only costs money.
    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.cache]
}

resource "aws_s3_bucket_policy" "cache" {
  bucket = aws_s3_bucket.cache.id
  policy = local.bucket_policy_json

  # Concurrent bucket-policy and public-access-block writes can fail with
  # OperationAborted; serialize them.
  depends_on = [aws_s3_bucket_public_access_block.cache]
}

resource "aws_iam_policy" "inference" {
  name        = local.iam_policy_name
  path        = var.iam_policy_path
  description = "vua_s3 KV-cache access to s3://${var.bucket_name}/${var.prefix}/ for inference nodes"
  policy      = local.inference_policy_json
  tags        = var.tags
}

resource "aws_iam_role_policy_attachment" "inference" {
  count = var.attach_to_role_name == null ? 0 : 1

  role       = var.attach_to_role_name
  policy_arn = aws_iam_policy.inference.arn
}
