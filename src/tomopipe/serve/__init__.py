"""``tomopipe serve``: the browser UI of a project (workflow graph, run forms, viewers).

See :func:`tomopipe.serve.app.create_app`; the security rules are in :mod:`tomopipe.serve.security`.
"""
