"""User tools around a run, each a ``python -m rdpo.X`` command: export a policy (`export`), try it
(`generate`), build and check rubric pools (`rubrics`, `rubric_build`), measure a judge and hand a
policy to lmms-eval / VLMEvalKit (`evaluate`, `handoff`, `lmms_task`).

The trainer (`rdpo.fit` and what it imports) never imports these.
"""
