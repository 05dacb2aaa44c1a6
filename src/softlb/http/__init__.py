"""HTTP plumbing of the proxy: pure header rules and the upstream (urllib3) boundary."""
