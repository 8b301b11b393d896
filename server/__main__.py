"""`python -m server serve MODEL ...` (same as `moemix serve`)."""

from server.cli import main

if __name__ == "__main__":
    main()
