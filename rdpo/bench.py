"""``python -m rdpo.bench`` runs `rdpo.dev.bench` (the command line stays as it was before the tool
moved; `python -m rdpo` lists every command)."""

if __name__ == "__main__":
    from rdpo.__main__ import run

    run("rdpo.dev.bench")
