"""`python -m ps` is the `paramserver` command."""

from ps.cli import main

if __name__ == "__main__":
    main(prog_name="paramserver")  # usage and errors name the command people type
