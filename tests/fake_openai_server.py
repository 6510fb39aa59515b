"""The tests' name for the scripted OpenAI-compatible server, which lives in
`rdpo.dev.bench.openai_server` (the round benchmark starts it too)."""

from rdpo.dev.bench.openai_server import (  # noqa: F401
    DEFAULT_RUBRIC,
    SETTINGS,
    FakeOpenAIServer,
    Seen,
    criterion_ids,
    response_of,
)
