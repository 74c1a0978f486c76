"""Ray entry points: one module per `ray job submit` step, each with `main(argv=None)`.

    ray job submit --working-dir . -- python -m ray_jobs.preprocess --config configs/demo.yaml

Ray glue only: the work itself is in the `htcl` library, which never imports Ray.
"""
