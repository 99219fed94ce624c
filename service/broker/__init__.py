"""`POST /v1/sessions`: a conversation token or signed URL for the app's server, and the id read from it."""
