"""Load tests with Locust: the governor protocol under a steady plan rate (issue 11)."""
