//! Buffers refilled from scratch on every use (gradients between optimizer steps)
//! that hold no memory between their uses.

/// Below this many bytes a buffer is just written with zeros.
const RELEASE_FROM: usize = 1 << 20;

/// Sets `buf` to zeros, handing its whole pages back to the kernel, which maps zero
/// pages there again on the next touch: between two uses, a buffer refilled on every
/// use (a gradient buffer between optimizer steps) costs no resident memory, where
/// `fill(0.0)` keeps every page resident. The partial pages at either end, a small
/// buffer, and any system without `madvise` get zeros written instead.
///
/// Only for a buffer of this process's heap (a `Vec` of the global allocator, which
/// maps private anonymous memory): a page of a shared mapping would not read back as
/// zeros, which is why this takes a `Vec` and not a slice.
pub fn zero_release(buf: &mut Vec<f32>) {
    let bytes = std::mem::size_of_val(buf.as_slice());
    if bytes < RELEASE_FROM || !release_pages(buf) {
        buf.fill(0.0);
    }
}

/// [`zero_release`] on part of a buffer, at any size: a lent slice of a model's
/// private buffer (a piece shard's whole-piece parameters or gradients, which the ABI
/// says are the model's heap, [`sheaf_core::Model::piece_params_mut`]), handed back
/// between the units that use it. Every whole page inside goes back, however few:
/// the buffer is as large as the piece, and a unit's part left resident after each use
/// would leave all of it resident by the end of the first pass.
pub fn zero_release_part(buf: &mut [f32]) {
    if !release_pages(buf) {
        buf.fill(0.0);
    }
}

/// Copies `src` into `dst` (as long) and sets `src` to zeros as [`zero_release`]
/// does, a MiB at a time: each page of `dst` is touched as one of `src` is handed
/// back, so the two buffers are never both resident (taking accumulated gradients
/// into a strategy's buffer whose pages were released since the last step).
///
/// # Panics
/// If the lengths differ.
pub fn take_release(src: &mut Vec<f32>, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "take_release between buffers of different lengths");
    let chunk = RELEASE_FROM / std::mem::size_of::<f32>();
    let whole = std::mem::size_of_val(src.as_slice()) >= RELEASE_FROM;
    for start in (0..src.len()).step_by(chunk) {
        let part = start..(start + chunk).min(src.len());
        dst[part.clone()].copy_from_slice(&src[part.clone()]);
        if !whole || !release_pages(&mut src[part.clone()]) {
            src[part].fill(0.0);
        }
    }
}

/// `madvise(MADV_DONTNEED)` over the whole pages inside `buf`, zeros written over the
/// rest; false (nothing changed) when the kernel refuses.
#[cfg(target_os = "linux")]
fn release_pages(buf: &mut [f32]) -> bool {
    // SAFETY: sysconf reads a constant of the system.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => return false,
    };
    let start = buf.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(buf);
    let (first, last) = (start.next_multiple_of(page), end - end % page);
    if last <= first {
        return false;
    }
    // SAFETY: [first, last) is whole pages inside `buf`, which this function borrows
    // mutably, of private anonymous memory (the caller's `Vec`): after MADV_DONTNEED
    // they read as zeros, so no reference sees anything but valid f32 zeros, and no
    // byte outside `buf` (the allocator's own bookkeeping) is touched.
    if unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_DONTNEED) } != 0 {
        return false;
    }
    let f32s = |a: usize| (a - start) / std::mem::size_of::<f32>();
    buf[..f32s(first)].fill(0.0);
    buf[f32s(last)..].fill(0.0);
    true
}

#[cfg(not(target_os = "linux"))]
fn release_pages(_: &mut [f32]) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value reads zero afterwards, the unaligned ends included, for buffers
    /// below and above the release size and offsets that leave partial pages.
    #[test]
    fn released_buffers_read_as_zeros() {
        for len in [0usize, 1, 1000, RELEASE_FROM / 4 - 1, RELEASE_FROM / 4 + 1234, 3 * RELEASE_FROM / 4 + 7]
        {
            let mut buf: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
            zero_release(&mut buf);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|&v| v == 0.0), "a value of {len} is not zero");
            // Written again after: the pages come back.
            buf.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            assert!(buf.iter().enumerate().all(|(i, &v)| v == i as f32));
        }
    }

    /// `take_release` copies every value, the ends of each MiB included, and leaves
    /// zeros, for lengths around the chunk size.
    #[test]
    fn taken_buffers_are_copied_and_zeroed() {
        let chunk = RELEASE_FROM / 4;
        for len in [0usize, 3, chunk - 1, chunk, 2 * chunk + 5, 3 * chunk + chunk / 2] {
            let want: Vec<f32> = (0..len).map(|i| i as f32 + 0.5).collect();
            let mut src = want.clone();
            let mut dst = vec![f32::NAN; len];
            take_release(&mut src, &mut dst);
            assert_eq!(dst, want, "{len}");
            assert!(src.iter().all(|&v| v == 0.0), "{len}");
        }
    }

    /// Held by every test that measures resident memory: one test's allocations and
    /// frees between another's two readings would pass or fail it for nothing.
    #[cfg(target_os = "linux")]
    static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// This process's resident bytes, as the kernel counts them.
    #[cfg(target_os = "linux")]
    fn resident() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        // SAFETY: sysconf reads a constant of the system.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
    }

    /// A part released reads zeros at every length and offset (whole pages handed
    /// back, partial ones written), and nothing beside it changes.
    #[test]
    fn released_parts_read_as_zeros_and_leave_the_rest() {
        let len = 3 * RELEASE_FROM / 4;
        for (start, end) in [(0, 0), (0, 1), (5, 1029), (1, len - 3), (4096, 3 * 4096), (0, len)] {
            let mut buf: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
            zero_release_part(&mut buf[start..end]);
            assert!(buf[start..end].iter().all(|&v| v == 0.0), "{start}..{end}");
            assert!(buf[..start].iter().enumerate().all(|(i, &v)| v == i as f32 + 1.0), "{start}..{end}");
            assert!(
                buf[end..].iter().enumerate().all(|(i, &v)| v == (end + i) as f32 + 1.0),
                "{start}..{end}"
            );
        }
    }

    /// A released 64 MiB part of a buffer, and a 64 MiB buffer taken into another,
    /// leave the process's resident memory by the kernel's count (a part or a source
    /// zeroed instead keeps its pages): at least 48 MiB each.
    #[cfg(target_os = "linux")]
    #[test]
    fn released_parts_and_taken_buffers_leave_resident_memory() {
        let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = vec![1f32; 18 << 20];
        let before = resident();
        zero_release_part(&mut buf[1 << 20..17 << 20]);
        let after = resident();
        assert!(before.saturating_sub(after) >= 48 << 20, "part: {before} -> {after} bytes resident");
        drop(buf);
        let mut src = vec![1f32; 16 << 20];
        let mut dst = vec![0f32; 16 << 20];
        dst.iter_mut().step_by(1024).for_each(|v| *v = 2.0);
        let before = resident();
        take_release(&mut src, &mut dst);
        let after = resident();
        assert!(before.saturating_sub(after) >= 48 << 20, "take: {before} -> {after} bytes resident");
    }

    /// A released 64 MiB buffer leaves the process's resident memory, by the kernel's
    /// count (at least 48 MiB of it: the other tests of this process allocate too).
    #[cfg(target_os = "linux")]
    #[test]
    fn released_pages_leave_resident_memory() {
        let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = vec![1f32; 16 << 20];
        let before = resident();
        zero_release(&mut buf);
        let after = resident();
        assert!(before.saturating_sub(after) >= 48 << 20, "resident {before} before, {after} after");
        assert!(buf.iter().all(|&v| v == 0.0));
    }
}
