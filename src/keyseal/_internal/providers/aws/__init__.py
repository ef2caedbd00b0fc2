"""AWS: the KMS client (endpoint, retries, error translation), the KMS key lifecycle, IAM policies."""
