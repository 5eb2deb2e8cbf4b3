//! `Held`: a hold on a page (`vm_page_hold`), the seed's `release_page` as
//! a drop.

use crate::frame::Frame;
use crate::object::{ObjGuard, Object};
use std::sync::Arc;

/// A hold on a page (`vm_page_hold`): pageout leaves it alone until dropped.
pub struct Held {
    pub(super) obj: Arc<Object>,
    pub(super) pindex: u64,
    /// Cleared when the page leaves `obj` with the hold already dropped
    /// (a COW rename moves it up).
    pub(super) armed: bool,
}

impl Held {
    pub(crate) fn new(g: &mut ObjGuard, obj: &Arc<Object>, pindex: u64) -> Option<Held> {
        let p = g.pages.get_mut(&pindex)?;
        p.hold_count = p.hold_count.saturating_add(1);
        Some(Held { obj: obj.clone(), pindex, armed: true })
    }
    /// The frame of the held page.
    pub fn frame(&self) -> Option<Frame> {
        self.obj.st.lock().pages.get(&self.pindex).map(|p| p.frame)
    }
    /// Whether this is an armed hold on page `pindex` of `obj`.
    pub(super) fn is_on(&self, obj: &Arc<Object>, pindex: u64) -> bool {
        self.armed && self.pindex == pindex && Arc::ptr_eq(&self.obj, obj)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut g = self.obj.st.lock();
        if let Some(p) = g.pages.get_mut(&self.pindex) {
            p.hold_count = p.hold_count.saturating_sub(1);
        }
    }
}
