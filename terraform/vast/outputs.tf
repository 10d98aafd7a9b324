output "url" {
  description = "The URL to give vua_s3 (VUA(..., url) or the vLLM connector's \"url\"). It carries the VAST settings; credentials are not part of it."
  value       = local.vua_s3_url
}

output "bucket_url" {
  description = "s3://bucket/prefix of the cache, without client settings."
  value       = local.bucket_url
}

output "endpoint_url" {
  description = "S3 endpoint URL of the cluster (VIP pool DNS name or address)."
  value       = local.endpoint_url
}

output "vua_s3_settings" {
  description = "The vua_s3 URL query settings a VAST endpoint needs, as a map (endpoint_url, addressing=path, checksum=when_required, region, and verify/ca_bundle when set)."
  value       = local.vua_s3_settings
}

output "access_key_id" {
  description = "S3 access key of the service user. Give it to inference nodes as AWS_ACCESS_KEY_ID."
  value       = vastdata_user_key.service.access_key
}

output "secret_access_key" {
  description = "S3 secret key of the service user (AWS_SECRET_ACCESS_KEY). Empty when pgp_public_key is set."
  value       = vastdata_user_key.service.secret_key
  sensitive   = true
}

output "encrypted_secret_access_key" {
  description = "The secret key encrypted with pgp_public_key, when one was given."
  value       = vastdata_user_key.service.encrypted_secret_key
}

output "view_id" {
  description = "ID of the bucket view."
  value       = vastdata_view.cache.id
}

output "s3_policy_id" {
  description = "ID of the S3 identity policy attached to the service user."
  value       = vastdata_s3_policy.cache.id
}

output "service_user_name" {
  description = "Name of the service user."
  value       = vastdata_user.service.name
}

output "vllm_kv_transfer_config" {
  description = "JSON for vLLM's --kv-transfer-config that points the VUAS3Connector at this cache, with the refresh_after that pairs with ttl_days."
  value = jsonencode({
    kv_connector              = "VUAS3Connector"
    kv_connector_module_path  = "vua_s3.integrations.vllm"
    kv_role                   = "kv_both"
    kv_connector_extra_config = merge({ url = local.vua_s3_url }, local.vua_options)
  })
}

output "refresh_after" {
  description = "Seconds for vua_s3's refresh_after that pair with ttl_days (null when refresh_after_hours = 0): VUA(config, url, refresh_after=...) or the connector's kv_connector_extra_config key. Also in vua_options and vllm_kv_transfer_config."
  value       = local.refresh_after_seconds

  precondition {
    condition     = local.refresh_pairing_ok
    error_message = "refresh_after_hours must be at most a quarter of ttl_days in hours: an object is re-stamped up to twice refresh_after after its last re-stamp, and must not expire before."
  }
}

output "vua_options" {
  description = "Keyword options for VUA/AsyncVUA that pair with this bucket's lifecycle rule: VUA(config, url, **options)."
  value       = local.vua_options
}
