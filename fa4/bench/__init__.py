"""`fa4 bench`: fa4 against its peers on one card (cli.py is the entry point; see `fa4 bench --help`)."""
