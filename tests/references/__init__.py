"""Independent reference implementations used by the tests (written from the papers, not from the code under test)."""
