"""`python -m podipc`: the command line, for callers that know an interpreter but not a PATH."""

from podipc.cli import main

if __name__ == "__main__":
    main(prog_name="podipc")
