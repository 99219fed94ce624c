"""Reliability tests (issue 7): crashes, outages, a full disk, concurrent writers; real processes on loopback."""
