"""The HTTP side: the Starlette app factory, its routes and the one place errors become answers."""
