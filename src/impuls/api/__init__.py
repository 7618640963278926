"""HTTP only: parse the request, call one registry or engine operation, shape the reply."""
