"""The admin HTTP API: auth, roles and tenants over the platform's domain modules.

``create_api(app)`` builds the ASGI application (see :mod:`tasks_platform.api.app`);
``tasks-platform api`` serves it, ``tasks-platform token ...`` manages its tokens.
"""
