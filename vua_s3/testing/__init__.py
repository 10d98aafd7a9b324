"""What the tests and the tools run against: local S3 servers on 127.0.0.1 (moto, SeaweedFS), a
fault-injecting proxy, a request-counting store and the storage contract suite.

The tools above the library (the demo, the bench, the soak) use it too; the library
itself (the verbs, storage, the integrations) never imports it."""
