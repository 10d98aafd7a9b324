data "vastdata_tenant" "this" {
  name = var.tenant_name
}

data "vastdata_view_policy" "s3" {
  name = var.view_policy_name
}

resource "vastdata_s3_policy" "cache" {
  name      = local.s3_policy_name
  tenant_id = data.vastdata_tenant.this.id
  enabled   = true
  policy    = local.s3_policy_json
}

resource "vastdata_user" "service" {
  name = var.service_user_name
  uid  = var.service_user_uid

  # The service user reads and writes fragments; it never manages buckets.
  allow_create_bucket = false
  allow_delete_bucket = false
  s3_superuser        = false
  s3_policies_ids     = [vastdata_s3_policy.cache.id]
}

resource "vastdata_user_key" "service" {
  user_id        = vastdata_user.service.id
  tenant_id      = data.vastdata_tenant.this.id
  enabled        = true
  pgp_public_key = var.pgp_public_key
}

resource "vastdata_view" "cache" {
  path       = local.view_path
  create_dir = true
  protocols  = ["S3"]
  policy_id  = data.vastdata_view_policy.s3.id
  tenant_id  = data.vastdata_tenant.this.id

  bucket                    = var.bucket_name
  bucket_owner              = local.bucket_owner
  allow_s3_anonymous_access = false
  # No s3_versioning: a cache needs no history, and VAST cannot turn
  # versioning off again once a view has it.
}

resource "vastdata_s3_life_cycle_rule" "expire_fragments" {
  name            = "${var.bucket_name}-expire-kv-fragments"
  view_id         = tostring(vastdata_view.cache.id)
  enabled         = true
  prefix          = local.key_prefix
  expiration_days = var.ttl_days
}

resource "vastdata_s3_life_cycle_rule" "abort_incomplete_uploads" {
  # No prefix: applies to every upload in the bucket.
  name                            = "${var.bucket_name}-abort-incomplete-mpu"
  view_id                         = tostring(vastdata_view.cache.id)
  enabled                         = true
  abort_mpu_days_after_initiation = var.abort_incomplete_multipart_days
}
