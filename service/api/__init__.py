"""The read API: routes, their query parameters, the read SQL, bearer-token auth and the OpenAPI document."""
