"""Test fakes that stand in for foreign libraries; only tests load them."""
