"""The ``vua-s3`` command line, above the library: it uses the library, never the reverse."""
