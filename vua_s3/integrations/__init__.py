"""Integrations with inference frameworks, one module each; none is imported by ``vua_s3`` itself."""
