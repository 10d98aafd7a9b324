"""Local S3 servers on 127.0.0.1 for the demo, the bench and the tests: moto (``moto``) and SeaweedFS
(``seaweed``). Never imported by the library itself."""
