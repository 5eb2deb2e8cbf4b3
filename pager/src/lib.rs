//! The BSD VM core (filled in by the pager issue).
