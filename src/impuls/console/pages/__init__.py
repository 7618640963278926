"""One module per part of the console; each has its ``routes``."""
