"""The rlchat Serve application: an OpenAI-compatible chat endpoint, a web chat page and user feedback.

- ``serve.app``: the Ray Serve deployment (``ChatServer``), its builder ``build_app`` and ``rlchat serve``.
- ``serve.schemas``: the OpenAI request/response models and error bodies.
- ``serve/static/index.html``: the web chat page served at ``/``.
- ``serve/serve_config.yaml``: a config for Ray's ``serve run`` / ``serve deploy``.
- ``serve.testing``: tiny checkpoints and one shared local app for tests and the load benchmark.

This package shares its name with Ray's: inside the project, Ray Serve is always ``from ray import serve``.
"""
