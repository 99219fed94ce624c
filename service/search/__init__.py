"""Full-text search of conversations: `q=` on GET /v1/conversations (words, document, query, index)."""
