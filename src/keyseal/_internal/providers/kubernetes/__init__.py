"""Kubernetes: the API client from the environment, ApiException as keyseal errors, the list+watch informer."""
