"""The app shell: the Starlette app factory, its lifespan and state, errors become answers, health and metrics."""
