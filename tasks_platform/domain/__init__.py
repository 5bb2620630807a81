"""Plain domain code the jobs call; nothing here imports Celery."""
