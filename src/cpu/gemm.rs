//! A bounds-checked face on the `gemm` crate's strided matrix product.

use gemm::Parallelism;

/// A read-only strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major matrix with leading dimension `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Mat {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn transposed(data: &'a [f32], ld: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: ld,
        }
    }

    fn check(&self, r: usize, c: usize) {
        if r > 0 && c > 0 {
            let last = (r - 1) * self.rs + (c - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `C = A B` (or `C += A B` when `accumulate`), with `C` row-major with leading dimension `ldc`.
/// `threads > 1` lets the product itself run in parallel, for products too few to parallelise
/// around.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    threads: usize,
) {
    // SAFETY: `c` is an exclusive borrow of `c.len()` elements.
    unsafe {
        matmul_raw(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c.len(),
            ldc,
            a,
            b,
            accumulate,
            threads,
        )
    }
}

/// `out (+)= a b` for row-major `a [m, k]` and `b [k, n]`, where every `rows_per_image`
/// consecutive rows belong to one image, in parallel over blocks of rows.
///
/// The blocks are cut per image from the image's row count alone, so an image's rows are
/// computed by the same products whatever the batch and the thread count: results are
/// bit-for-bit batch invariant. (The product's blocking depends on its sizes.)
pub fn matmul_rows(
    a: &[f32],
    k: usize,
    b: Mat,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    rows_per_image: usize,
) {
    use rayon::prelude::*;
    let m = a.len() / k;
    assert_eq!(out.len(), m * n);
    assert!(rows_per_image > 0 && m % rows_per_image == 0);
    // At most 256 rows per block, and two blocks per image when there are 64 rows or more.
    let blocks = rows_per_image
        .div_ceil(256)
        .max(if rows_per_image >= 64 { 2 } else { 1 });
    let chunk = rows_per_image.div_ceil(blocks);
    out.par_chunks_mut(rows_per_image * n)
        .zip(a.par_chunks(rows_per_image * k))
        .flat_map(|(o, a)| o.par_chunks_mut(chunk * n).zip(a.par_chunks(chunk * k)))
        .for_each(|(o, a)| matmul(o.len() / n, n, k, o, n, Mat::rows(a, k), b, accumulate, 1));
}

/// [`matmul`] into `len` elements at `c`, for callers whose concurrent products write
/// interleaved but disjoint elements of one buffer (attention heads), where no `&mut` slice
/// can be handed out.
///
/// # Safety
/// `c..c + len` must be valid for writes, and no other thread may read or write the elements
/// this product writes while it runs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    len: usize,
    ldc: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * ldc + n <= len, "output view out of bounds");
    a.check(m, k);
    b.check(k, n);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
            }
        }
        return;
    }
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // Every element each view can touch was bounds-checked above.
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 1.0).collect();
        let mut c = vec![1.0; m * n];
        matmul(
            m,
            n,
            k,
            &mut c,
            n,
            Mat::rows(&a, k),
            Mat::rows(&b, n),
            true,
            1,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum::<f32>();
                assert_eq!(c[i * n + j], want);
            }
        }
        // A^T view of a k x m matrix.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let mut c2 = vec![0.0; m * n];
        matmul(
            m,
            n,
            k,
            &mut c2,
            n,
            Mat::transposed(&at, m),
            Mat::rows(&b, n),
            false,
            2,
        );
        for (x, y) in c.iter().zip(&c2) {
            assert_eq!(*x, y + 1.0);
        }
    }
}
