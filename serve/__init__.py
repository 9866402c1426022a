"""The rlchat Serve application: an OpenAI-compatible chat endpoint, a web chat page and user feedback.

Split by job (the package imports only the core, plus Ray Serve; ``rlchat serve`` itself is
``rlchat/cli/serve_cmd.py``):

- ``serve.app``: the routes -- the Ray Serve deployment ``ChatServer`` (a FastAPI ingress), its builder
  ``build_app``, error handlers, CORS.
- ``serve.batching``: the replica's scheduler (``Batcher``): continuous batching on one generation thread,
  admission, deadlines, cancellation; ``serve.decode_batch``: the KV-cache batch that rows join and leave.
- ``serve.models``: the served versions (canary weights, in-place promote / roll back, ``--follow``) and where a
  replica gets its checkpoint (a path, a ``pyarrow.fs`` URI, or a copy shipped through the object store).
- ``serve.settings``: everything resolved once on the driver (checkpoint, ``serve.*`` config, API key, deployment
  options).
- ``serve.schemas``: the OpenAI request/response models and error bodies; ``serve.formats``: chat and text
  completions, plain and streamed.
- ``serve.feedback``: ratings and preference pairs into the feedback store; ``serve.safety``: the optional filter.
- ``serve.metrics``: Prometheus metrics through ``ray.serve.metrics``.
- ``serve/static/index.html``: the web chat page served at ``/``; ``serve/serve_config.yaml``: a config for Ray's
  ``serve run`` / ``serve deploy``.
- ``serve.testing``: tiny checkpoints and one shared local app for tests and the load benchmark.

This package shares its name with Ray's: inside the project, Ray Serve is always ``from ray import serve``.
"""
