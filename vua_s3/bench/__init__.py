"""The bench, above the library: measurements (``run``), the floors it compares with
(``baseline``) and the report (``report``)."""
