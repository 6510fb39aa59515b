"""``python -m rdpo.generate`` runs `rdpo.tools.try_policy` (the command line stays as it was before the tool
moved; `python -m rdpo` lists every command)."""

if __name__ == "__main__":
    from rdpo.__main__ import run

    run("rdpo.tools.try_policy")
