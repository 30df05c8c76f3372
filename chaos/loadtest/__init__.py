"""Load tests with Locust: the governor protocol as a Locust ``User``.

The pieces (``loadtests/locustfile.py`` wires them to Locust's events):

* :mod:`chaos.loadtest.options`: the command-line options and the task mix;
* :mod:`chaos.loadtest.world`: the chaos harness's Redis, governors, apply layer, exchange
  and recorder, in a plain-Python child process (no gevent there: the harness uses
  threads and blocking SQLite), judged by the checkers when it stops;
* :mod:`chaos.loadtest.latency`: the HDR histogram and Locust's finer bucketing;
* :mod:`chaos.loadtest.user`: the paced sender, the one events reader per process, and
  the ``GovernorUser``.

See docs/loadtests.md.
"""
