"""Ray Serve application of htcl: `serving.app.build_app(args)`; `htcl serve` (serving/run.py)."""
