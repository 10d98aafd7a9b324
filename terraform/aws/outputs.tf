output "url" {
  description = "The URL to give vua_s3 (VUA(..., url) or the vLLM connector's \"url\"). Credentials are not part of it; nodes use the standard AWS chain."
  value       = "s3://${aws_s3_bucket.cache.id}/${var.prefix}?region=${local.region}"
}

output "bucket_url" {
  description = "s3://bucket/prefix of the cache, without client settings."
  value       = "s3://${aws_s3_bucket.cache.id}/${var.prefix}"
}

output "bucket_name" {
  description = "Name of the cache bucket."
  value       = aws_s3_bucket.cache.id
}

output "bucket_arn" {
  description = "ARN of the cache bucket."
  value       = aws_s3_bucket.cache.arn
}

output "region" {
  description = "Region the bucket lives in."
  value       = local.region
}

output "policy_arn" {
  description = "ARN of the least-privilege IAM policy for inference nodes."
  value       = aws_iam_policy.inference.arn
}

output "policy_json" {
  description = "The rendered IAM policy document, for review."
  value       = local.inference_policy_json
}

output "vllm_kv_transfer_config" {
  description = "JSON for vLLM's --kv-transfer-config that points the VUAS3Connector at this cache, with the refresh_after that pairs with ttl_days."
  value = jsonencode({
    kv_connector              = "VUAS3Connector"
    kv_connector_module_path  = "vua_s3.integrations.vllm"
    kv_role                   = "kv_both"
    kv_connector_extra_config = merge({ url = "s3://${aws_s3_bucket.cache.id}/${var.prefix}?region=${local.region}" }, local.vua_options)
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
