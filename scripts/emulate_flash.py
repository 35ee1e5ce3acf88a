# Lane-level emulation of kernels/attention.cu's fused attention kernels (attention_flash_*), in
# float64 without tf32 rounding, against the exact attention and its gradient: every fragment
# index, mask and buffer offset as the CUDA code has them, warps run one after another between
# barriers. It also checks the cp.async protocol: a copy is pending from its issue until the
# wait that retires its group; reading a pending element, reading an element nothing wrote, or
# copying onto an element read since the last barrier, or reading a copy that landed (a wait)
# before a barrier published it to every thread, fails an assertion.
# Run: python3 scripts/emulate_flash.py (numpy; ~15 s). Keep it in step with the kernels.
# Deliberate mutations fail it as they should: a wrong relabelling of the A fragment (an error of
# order 1), the next chunk's panel issued one step early (a read of a pending copy; it needs
# the four chunks of L = 200), and the barrier after a step's wait left out.
import numpy as np, itertools
ROWS=CHUNK=64; DK=32; DC=64; THREADS=128; SP=DK+4; CP=DC+4; SLICE=ROWS*SP; PANEL=CHUNK*CP

class Smem:
    def __init__(s, n): s.m=np.full(n, np.nan); s.pending=[]; s.read_since_sync=set(); s.open={}; s.landed=set()
    def copy(s, dst, val):  # into the newest open group
        assert dst not in s.read_since_sync, f"copy onto {dst} read since the last barrier"
        s.open[dst]=val
    def begin(s): s.open={}
    def commit(s): s.pending.append(s.open); s.open={}
    def wait(s, n):
        while len(s.pending) > n:
            for dst, val in s.pending.pop(0).items(): s.m[dst]=val; s.landed.add(dst)
    # A wait retires only the waiting thread's copies; the others' become visible at the barrier.
    def sync(s): s.read_since_sync=set(); s.landed=set()
    def rd(s, i):
        assert i not in s.landed, f"read of {i}: landed, but no barrier since"
        for grp in s.pending: assert i not in grp, f"read of pending {i}"
        s.read_since_sync.add(i)
        v=s.m[i]; assert not np.isnan(v), f"read of unwritten {i}"; return v

def fa_load(sm, base, G, r0, rows, c0, W):  # G: 2-d global matrix (rows x cols)
    for e in range(ROWS*(W//4)):
        r=e//(W//4); c=(e%(W//4))*4
        ok=r0+r<rows
        for j in range(4):
            sm.copy(base+r*(W+4)+c+j, G[r0+r, c0+c+j] if ok else 0.0)
def fa_load_vec(sm, base, vec, r0, rows):
    for e in range(CHUNK):
        ok=r0+e<rows
        sm.copy(base+e, vec[r0+e] if ok else 0.0)

def mma(acc, a, b0, b1):  # acc[lane][4], a[lane][4], b0/b1[lane]; PTX m16n8k8 tf32 fragments
    A=np.zeros((16,8)); B=np.zeros((8,8))
    for l in range(32):
        g,q=l>>2,l&3
        A[g,q]=a[l][0]; A[g+8,q]=a[l][1]; A[g,q+4]=a[l][2]; A[g+8,q+4]=a[l][3]
        B[q,g]=b0[l]; B[q+4,g]=b1[l]
    D=A@B
    for l in range(32):
        g,q=l>>2,l&3
        acc[l][0]+=D[g,2*q]; acc[l][1]+=D[g,2*q+1]; acc[l][2]+=D[g+8,2*q]; acc[l][3]+=D[g+8,2*q+1]

def fa_slice(sm, acc, a, b, wr):  # acc[lane][t][4]
    for k8 in range(0,DK,8):
        af=[]
        for l in range(32):
            g,q=l>>2,l&3; a0=a+(wr+g)*SP+k8+q
            af.append([sm.rd(a0), sm.rd(a0+8*SP), sm.rd(a0+4), sm.rd(a0+8*SP+4)])
        for t in range(8):
            b0=[];b1=[]
            for l in range(32):
                g,q=l>>2,l&3; p=b+(8*t+g)*SP+k8+q
                b0.append(sm.rd(p)); b1.append(sm.rd(p+4))
            tmp=[acc[l][t] for l in range(32)]
            mma(tmp, af, b0, b1)
def fa_c_product(sm, acc, p, b):
    for j in range(8):
        af=[[p[l][j][0],p[l][j][2],p[l][j][1],p[l][j][3]] for l in range(32)]
        for t in range(8):
            b0=[];b1=[]
            for l in range(32):
                g,q=l>>2,l&3; ptr=b+(8*j+2*q)*CP+g
                b0.append(sm.rd(ptr+8*t)); b1.append(sm.rd(ptr+CP+8*t))
            tmp=[acc[l][t] for l in range(32)]
            mma(tmp, af, b0, b1)
def zeros(): return [[[0.0]*4 for _ in range(8)] for _ in range(32)]

def mainloop(sm, steps, slices, issue, pairs, end_of_chunk):
    """fa_mainloop: pairs = [(a, b)] slice buffers; per warp w, acc[w][i] += A_i B_iᵀ; at a
    chunk's last slice end_of_chunk(chunk, w, acc[w]). The caller has issued step 0."""
    acc=[[None]*len(pairs) for _ in range(4)]
    for s in range(steps):
        chunk,sl=divmod(s,slices)
        sm.begin()
        if s+1<steps: issue(s+1)
        else: sm.commit()
        sm.wait(1); sm.sync()
        for w in range(4):
            for i,(a,b) in enumerate(pairs):
                if sl==0: acc[w][i]=zeros()
                fa_slice(sm, acc[w][i], a+(s&1)*SLICE, b+(s&1)*SLICE, w*16)
            if sl==slices-1: end_of_chunk(chunk, w, acc[w])
        sm.sync()

def blocks(qkv, y, dout, L, H, d):
    """fa_block for every block of the grid: its head's Q, K, V, O, dO (rows x d), tile row r0,
    chunk column c0, and the grid indices."""
    inner=H*d
    for bx,by,bz in itertools.product(range((L+63)//64), range(d//DC), range(qkv.shape[0]*H)):
        img,h=divmod(bz,H)
        cols=lambda m, part: m[img][:, part*inner+h*d:part*inner+(h+1)*d] if m is not None else None
        yield dict(bx=bx, by=by, bz=bz, img=img, h=h, Q=cols(qkv,0), K=cols(qkv,1), V=cols(qkv,2),
                   O=cols(y,0), dO=cols(dout,0), r0=bx*ROWS, c0=by*DC)

def fa_store(frags, out, r0, L, c0, mul, accumulate):
    """fa_store for the 4 warps: frags[w][lane][t][4] times mul(w, lane, r) into out (rows x
    cols, the head's columns), rows at or past L skipped."""
    for w in range(4):
        for l in range(32):
            g,q=l>>2,l&3
            for r in range(2):
                row=r0+w*16+g+8*r
                if row>=L: continue
                for t in range(8):
                    for j in range(2):
                        c=c0+8*t+2*q+j
                        v=frags[w][l][t][2*r+j]*mul(w,l,r)
                        out[row,c]=v+(out[row,c] if accumulate else 0)

def forward(qkv, n, L, H, d, scale):
    inner=H*d; y=np.full((n,L,inner),np.nan); lse=np.full((n*H,L),np.nan)
    slices=d//DK; chunks=(L+63)//64; steps=chunks*slices
    for blk in blocks(qkv, None, None, L, H, d):
        Q,K,V,r0,c0,by,bz=(blk[k] for k in ('Q','K','V','r0','c0','by','bz'))
        sm=Smem(2*SLICE+2*SLICE+2*PANEL); qs=0; ks=2*SLICE; vs=4*SLICE
        def issue(s):
            kc,sl=divmod(s,slices)
            fa_load(sm, qs+(s&1)*SLICE, Q, r0, L, sl*DK, DK)
            fa_load(sm, ks+(s&1)*SLICE, K, kc*CHUNK, L, sl*DK, DK)
            if sl==1 and kc+1<chunks: fa_load(sm, vs+((kc+1)&1)*PANEL, V, (kc+1)*CHUNK, L, c0, DC)
            sm.commit()
        sm.begin(); fa_load(sm, vs, V, 0, L, c0, DC); issue(0)
        W=[[[[-np.inf]*2,[0.0]*2] for _ in range(32)] for _ in range(4)]  # per warp, lane: m_run, l_run
        o=[zeros() for _ in range(4)]
        def end_of_chunk(kc, w, acc):
            ml=W[w]; sa=acc[0]
            mx=[[ml[l][0][0],ml[l][0][1]] for l in range(32)]
            for l in range(32):
                g,q=l>>2,l&3
                for t in range(8):
                    for e in range(4):
                        key=kc*CHUNK+8*t+2*q+(e&1)
                        v=sa[l][t][e]*scale if key<L else -np.inf
                        sa[l][t][e]=v; mx[l][e>>1]=max(mx[l][e>>1],v)
            qm=[[max(mx[(l&~3)+i][r] for i in range(4)) for r in range(2)] for l in range(32)]
            for l in range(32):
                for r in range(2):
                    corr=np.exp(ml[l][0][r]-qm[l][r]); ml[l][0][r]=qm[l][r]; ml[l][1][r]*=corr
                    for t in range(8):
                        o[w][l][t][2*r]*=corr; o[w][l][t][2*r+1]*=corr
                for t in range(8):
                    for e in range(4):
                        p=np.exp(sa[l][t][e]-qm[l][e>>1]); sa[l][t][e]=p; ml[l][1][e>>1]+=p
            fa_c_product(sm, o[w], sa, vs+(kc&1)*PANEL)
        mainloop(sm, steps, slices, issue, [(qs, ks)], end_of_chunk)
        lsum=lambda w,l,r: sum(W[w][(l&~3)+i][1][r] for i in range(4))
        for w in range(4):
            for l in range(32):
                for r in range(2):
                    row=r0+w*16+(l>>2)+8*r
                    if by==0 and l&3==0 and row<L: lse[bz,row]=W[w][l][0][r]+np.log(lsum(w,l,r))
        fa_store(o, y[blk['img']][:, blk['h']*d:(blk['h']+1)*d], r0, L, c0, lambda w,l,r: 1/lsum(w,l,r), False)
    return y, lse

def backward(qkv, y, dout, lse, n, L, H, d, scale, g0, accumulate):
    inner=H*d; dqkv=g0.copy(); dsum=np.full((n*H,L),np.nan)
    slices=d//DK; chunks=(L+63)//64; steps=chunks*slices
    # dq
    one=lambda w,l,r: 1.0
    head=lambda b, part: dqkv[b['img']][:, part*inner+b['h']*d:part*inner+(b['h']+1)*d]
    for blk in blocks(qkv, y, dout, L, H, d):
        Q,K,V,O,dO,r0,c0,by,bz=(blk[k] for k in ('Q','K','V','O','dO','r0','c0','by','bz'))
        sm=Smem(8*SLICE+2*PANEL+ROWS); qs=0; dos=2*SLICE; ks=4*SLICE; vs=6*SLICE; kp=8*SLICE; ds_s=kp+2*PANEL
        def issue(s):
            kc,sl=divmod(s,slices)
            fa_load(sm, qs+(s&1)*SLICE, Q, r0, L, sl*DK, DK)
            fa_load(sm, dos+(s&1)*SLICE, dO, r0, L, sl*DK, DK)
            fa_load(sm, ks+(s&1)*SLICE, K, kc*CHUNK, L, sl*DK, DK)
            fa_load(sm, vs+(s&1)*SLICE, V, kc*CHUNK, L, sl*DK, DK)
            if sl==1 and kc+1<chunks: fa_load(sm, kp+((kc+1)&1)*PANEL, K, (kc+1)*CHUNK, L, c0, DC)
            sm.commit()
        sm.begin(); fa_load(sm, kp, K, 0, L, c0, DC); issue(0)
        for r in range(ROWS):
            row=r0+r; acc=float(O[row]@dO[row]) if row<L else 0.0
            sm.m[ds_s+r]=acc
            if by==0 and row<L: dsum[bz,row]=acc
        sm.sync()
        dq=[zeros() for _ in range(4)]
        def end_of_chunk(kc, w, acc):
            S,DP=acc
            for l in range(32):
                g,q=l>>2,l&3
                for t in range(8):
                    for e in range(4):
                        r=e>>1; row=r0+w*16+g+8*r
                        ls=lse[bz,row] if row<L else 0.0; D=sm.rd(ds_s+w*16+g+8*r)
                        key=kc*CHUNK+8*t+2*q+(e&1)
                        p=np.exp(S[l][t][e]*scale-ls) if key<L else 0.0
                        S[l][t][e]=p*(DP[l][t][e]-D)*scale
            fa_c_product(sm, dq[w], S, kp+(kc&1)*PANEL)
        mainloop(sm, steps, slices, issue, [(qs, ks), (dos, vs)], end_of_chunk)
        fa_store(dq, head(blk, 0), r0, L, c0, one, accumulate)
    # dkv
    for blk in blocks(qkv, y, dout, L, H, d):
        Q,K,V,dO,r0,c0,bz=(blk[k] for k in ('Q','K','V','dO','r0','c0','bz'))
        sm=Smem(8*SLICE+4*PANEL+4*CHUNK); ks=0; vs=2*SLICE; qs=4*SLICE; dos=6*SLICE; qp=8*SLICE; dop=qp+2*PANEL; lse_s=dop+2*PANEL; dsum_s=lse_s+2*CHUNK
        def panels(qc):
            b=qc&1
            fa_load(sm, qp+b*PANEL, Q, qc*CHUNK, L, c0, DC)
            fa_load(sm, dop+b*PANEL, dO, qc*CHUNK, L, c0, DC)
            fa_load_vec(sm, lse_s+b*CHUNK, lse[bz], qc*CHUNK, L)
            fa_load_vec(sm, dsum_s+b*CHUNK, dsum[bz], qc*CHUNK, L)
        def issue(s):
            qc,sl=divmod(s,slices)
            fa_load(sm, ks+(s&1)*SLICE, K, r0, L, sl*DK, DK)
            fa_load(sm, vs+(s&1)*SLICE, V, r0, L, sl*DK, DK)
            fa_load(sm, qs+(s&1)*SLICE, Q, qc*CHUNK, L, sl*DK, DK)
            fa_load(sm, dos+(s&1)*SLICE, dO, qc*CHUNK, L, sl*DK, DK)
            if sl==1 and qc+1<chunks: panels(qc+1)
            sm.commit()
        sm.begin(); panels(0); issue(0)
        dk=[zeros() for _ in range(4)]; dv=[zeros() for _ in range(4)]
        def end_of_chunk(qc, w, acc):
            ST,DPT=acc; b=qc&1
            for l in range(32):
                g,q=l>>2,l&3
                for t in range(8):
                    for e in range(4):
                        c=8*t+2*q+(e&1)
                        p=np.exp(ST[l][t][e]*scale-sm.rd(lse_s+b*CHUNK+c)) if qc*CHUNK+c<L else 0.0
                        ST[l][t][e]=p
                        DPT[l][t][e]=p*(DPT[l][t][e]-sm.rd(dsum_s+b*CHUNK+c))*scale
            fa_c_product(sm, dv[w], ST, dop+b*PANEL)
            fa_c_product(sm, dk[w], DPT, qp+b*PANEL)
        mainloop(sm, steps, slices, issue, [(ks, qs), (vs, dos)], end_of_chunk)
        fa_store(dk, head(blk, 1), r0, L, c0, one, accumulate)
        fa_store(dv, head(blk, 2), r0, L, c0, one, accumulate)
    return dqkv

def reference(qkv, dout, n, L, H, d, scale, g0, accumulate):
    inner=H*d; y=np.zeros((n,L,inner)); dq=np.zeros_like(qkv)
    for img in range(n):
        for h in range(H):
            Q=qkv[img][:, h*d:(h+1)*d]; K=qkv[img][:, inner+h*d:inner+(h+1)*d]; V=qkv[img][:, 2*inner+h*d:2*inner+(h+1)*d]
            S=Q@K.T*scale; P=np.exp(S-S.max(1,keepdims=True)); P/=P.sum(1,keepdims=True)
            y[img][:, h*d:(h+1)*d]=P@V
            dO=dout[img][:, h*d:(h+1)*d]
            dV=P.T@dO; dP=dO@V.T; dS=P*(dP-(dP*P).sum(1,keepdims=True))*scale
            dq[img][:, h*d:(h+1)*d]=dS@K; dq[img][:, inner+h*d:inner+(h+1)*d]=dS.T@Q; dq[img][:, 2*inner+h*d:2*inner+(h+1)*d]=dV
    return y, (g0+dq if accumulate else dq)

rng=np.random.default_rng(0)
for n,L,H,d,acc in [(1,100,1,64,False),(1,64,2,64,True),(2,70,1,128,False),(1,200,1,64,True)]:
    inner=H*d; qkv=rng.uniform(-1.5,1.5,(n,L,3*inner)); dout=rng.uniform(-1,1,(n,L,inner)); g0=rng.uniform(-1,1,qkv.shape)
    scale=1/np.sqrt(d)
    y_ref, g_ref = reference(qkv, dout, n, L, H, d, scale, g0, acc)
    y, lse = forward(qkv, n, L, H, d, scale)
    e1=np.abs(y-y_ref).max()
    g = backward(qkv, y, dout, lse, n, L, H, d, scale, g0, acc)
    e2=np.abs(g-g_ref).max()
    print(f"n{n} L{L} H{H} d{d} accumulate {acc}: forward max error {e1:.1e}, gradient {e2:.1e}")
    assert max(e1, e2) < 1e-12 and not (np.isnan(y).any() or np.isnan(g).any())
