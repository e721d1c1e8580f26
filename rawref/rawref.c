/*
 * rawref: non-owning references that work for objects whose type does not
 * support weak references (mypyc native classes, classes with __slots__
 * without __weakref__).
 *
 *     r = rawref.ref(obj)   # does not keep obj alive
 *     r()                   # obj while it is alive, None once it is gone
 *
 * How it works
 * ------------
 * * If the target's type supports weak references, the ref simply holds a
 *   real weakref internally.
 * * Otherwise the ref stores a borrowed pointer to the target and registers it
 *   in a process-wide hash table keyed by the target's address (one ref per
 *   target: ref(obj) returns the existing ref if there is one).  The first time
 *   an object of a given type is referenced, the type is "hooked" so that the
 *   death of any of its instances removes the registry entry and clears the
 *   ref's pointer before the memory can be freed or reused:
 *     - the type whose tp_dealloc actually runs for the instance (the type
 *       itself, or for Python subclasses the nearest base whose tp_dealloc is
 *       not subtype_dealloc, exactly the one subtype_dealloc will call) gets its
 *       tp_dealloc replaced by hooked_dealloc, which invalidates the refs and
 *       then calls the saved original; the original is looked up per type by
 *       walking tp_base, so subclasses that inherited the hooked slot and C
 *       deallocs that chain to their base's tp_dealloc both work;
 *     - if that type is a static type (e.g. `object` for a plain Python class
 *       with __slots__ and no __weakref__), the heap type of the instance gets
 *       its tp_free replaced instead (the last thing that happens to the
 *       object's memory).
 *   Hooked types are kept alive forever (a strong reference is held) so that a
 *   type pointer in the table can never be recycled.
 * * r() additionally refuses to return an object whose reference count is 0
 *   (an object in the middle of its own deallocation).
 *
 * Limitations: single-interpreter, GIL builds only.  An object that is
 * resurrected by a finalizer run from its tp_dealloc is treated as dead by its
 * existing refs (they return None; they never return freed memory).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <assert.h>
#include <stddef.h>

#ifdef Py_GIL_DISABLED
#error "rawref does not support free-threaded CPython builds"
#endif

#if defined(_MSC_VER)
#define RAWREF_TLS __declspec(thread)
#else
#define RAWREF_TLS _Thread_local
#endif

/* ------------------------------------------------------------------------ */
/* Pointer -> pointer open-addressing hash map (linear probing, backward-shift */
/* deletion, no tombstones).  Keys are never NULL.                             */
/* ------------------------------------------------------------------------ */

typedef struct {
    void *key;
    void *value;
} PtrSlot;

typedef struct {
    PtrSlot *slots;
    size_t mask; /* capacity - 1, capacity is a power of two (0 if no table) */
    size_t used;
} PtrMap;

static inline size_t
ptr_hash(const void *p)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

static inline void *
ptrmap_get(const PtrMap *m, const void *key)
{
    if (m->slots == NULL) {
        return NULL;
    }
    size_t i = ptr_hash(key) & m->mask;
    for (;;) {
        void *k = m->slots[i].key;
        if (k == key) {
            return m->slots[i].value;
        }
        if (k == NULL) {
            return NULL;
        }
        i = (i + 1) & m->mask;
    }
}

/* Insert into a table known to have room and not to contain key. */
static void
ptrmap_insert_raw(PtrSlot *slots, size_t mask, void *key, void *value)
{
    size_t i = ptr_hash(key) & mask;
    while (slots[i].key != NULL) {
        i = (i + 1) & mask;
    }
    slots[i].key = key;
    slots[i].value = value;
}

static int
ptrmap_resize(PtrMap *m, size_t new_cap)
{
    PtrSlot *slots = (PtrSlot *)PyMem_Calloc(new_cap, sizeof(PtrSlot));
    if (slots == NULL) {
        return -1;
    }
    if (m->slots != NULL) {
        for (size_t i = 0; i <= m->mask; i++) {
            if (m->slots[i].key != NULL) {
                ptrmap_insert_raw(slots, new_cap - 1, m->slots[i].key, m->slots[i].value);
            }
        }
        PyMem_Free(m->slots);
    }
    m->slots = slots;
    m->mask = new_cap - 1;
    return 0;
}

/* Insert or overwrite.  Returns -1 (without a Python exception) on OOM. */
static int
ptrmap_set(PtrMap *m, void *key, void *value)
{
    assert(key != NULL);
    if (m->slots != NULL) {
        size_t i = ptr_hash(key) & m->mask;
        while (m->slots[i].key != NULL) {
            if (m->slots[i].key == key) {
                m->slots[i].value = value;
                return 0;
            }
            i = (i + 1) & m->mask;
        }
    }
    size_t cap = m->slots == NULL ? 0 : m->mask + 1;
    if ((m->used + 1) * 2 > cap) { /* keep load factor <= 1/2 */
        size_t new_cap = cap == 0 ? 64 : cap * 2;
        if (ptrmap_resize(m, new_cap) < 0) {
            return -1;
        }
    }
    ptrmap_insert_raw(m->slots, m->mask, key, value);
    m->used++;
    return 0;
}

/* Remove key; returns its value or NULL if absent.  Never allocates. */
static void *
ptrmap_pop(PtrMap *m, const void *key)
{
    if (m->slots == NULL) {
        return NULL;
    }
    size_t mask = m->mask;
    PtrSlot *s = m->slots;
    size_t i = ptr_hash(key) & mask;
    for (;;) {
        if (s[i].key == key) {
            break;
        }
        if (s[i].key == NULL) {
            return NULL;
        }
        i = (i + 1) & mask;
    }
    void *value = s[i].value;
    /* backward-shift deletion */
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (s[j].key == NULL) {
            break;
        }
        size_t home = ptr_hash(s[j].key) & mask;
        /* Can the entry at j be moved to the hole at i?  Only if its home
           slot is not cyclically within (i, j]. */
        int in_range = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (in_range) {
            continue;
        }
        s[i] = s[j];
        i = j;
    }
    s[i].key = NULL;
    s[i].value = NULL;
    m->used--;
    return value;
}

/* ------------------------------------------------------------------------ */
/* Global state                                                             */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyTypeObject *type;   /* strong reference, never released */
    destructor orig_dealloc; /* non-NULL if we replaced tp_dealloc */
    freefunc orig_free;      /* non-NULL if we replaced tp_free */
} HookedType;

typedef struct RefObject RefObject;

/* object address -> RefObject* (borrowed both ways; the ref removes its own
   entry when it dies, the hook removes it when the target dies). */
static PtrMap registry = {NULL, 0, 0};
/* PyTypeObject* -> HookedType* */
static PtrMap hooked_types = {NULL, 0, 0};
static destructor subtype_dealloc_ptr = NULL; /* CPython's subtype_dealloc */

/* Re-entrancy tracking for hooked_dealloc: a C dealloc may chain to its
   base's tp_dealloc, which can also be hooked.  Each active hooked_dealloc
   call pushes a frame (on the C stack); a nested call for the same object
   continues the search for the original below the type found last time. */
typedef struct DeallocFrame {
    PyObject *obj;
    PyTypeObject *found;
    struct DeallocFrame *prev;
} DeallocFrame;

static RAWREF_TLS DeallocFrame *dealloc_top = NULL;

/* ------------------------------------------------------------------------ */
/* The ref type                                                             */
/* ------------------------------------------------------------------------ */

struct RefObject {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *target;  /* hook mode: borrowed pointer, NULL once dead */
    PyObject *wr;      /* weakref mode: strong ref to a weakref object */
    uintptr_t addr;    /* address of the target at creation (hash/repr) */
};

static PyTypeObject RefType;

static inline void
invalidate_address(PyObject *obj)
{
    RefObject *r = (RefObject *)ptrmap_pop(&registry, obj);
    if (r != NULL) {
        assert(r->target == obj);
        r->target = NULL;
    }
}

/* Returns a borrowed pointer to the live target, or NULL. */
static inline PyObject *
ref_get(RefObject *self)
{
    PyObject *t = self->target;
    if (t != NULL) {
        return Py_REFCNT(t) > 0 ? t : NULL;
    }
    if (self->wr != NULL) {
#if PY_VERSION_HEX >= 0x030D0000
        PyObject *strong = NULL;
        if (PyWeakref_GetRef(self->wr, &strong) <= 0) {
            PyErr_Clear();
            return NULL;
        }
        /* borrowed semantics: the weakref target stays alive while we hold
           it; drop the extra reference (the caller increfs again). */
        Py_DECREF(strong);
        t = strong;
#else
        t = PyWeakref_GET_OBJECT(self->wr);
        if (t == Py_None) {
            return NULL;
        }
#endif
        return Py_REFCNT(t) > 0 ? t : NULL;
    }
    return NULL;
}

/* ---- hooks --------------------------------------------------------------- */

static void hooked_dealloc(PyObject *self);
static void hooked_free(void *ptr);

static HookedType *
find_dealloc_entry(PyTypeObject *start)
{
    for (PyTypeObject *t = start; t != NULL; t = t->tp_base) {
        HookedType *e = (HookedType *)ptrmap_get(&hooked_types, t);
        if (e != NULL && e->orig_dealloc != NULL) {
            return e;
        }
    }
    return NULL;
}

static void
hooked_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyTypeObject *start = tp;
    DeallocFrame *top = dealloc_top;
    if (top != NULL && top->obj == self) {
        /* chained call from the original dealloc of a subtype */
        start = top->found->tp_base;
    }
    HookedType *e = find_dealloc_entry(start);
    if (e == NULL && start != tp) {
        /* nothing hooked below: not a chained call after all (a new object
           that reuses the address of the one being torn down) */
        start = tp;
        e = find_dealloc_entry(start);
    }
    if (e == NULL) {
        Py_FatalError("rawref: hooked tp_dealloc called but no original dealloc is known");
        return;
    }
    /* The object is dead from now on: no ref may return it. */
    invalidate_address(self);

    DeallocFrame frame;
    frame.obj = self;
    frame.found = e->type;
    frame.prev = top;

    /* Replacing tp_dealloc defeats the trashcan of the original dealloc
       (Py_TRASHCAN_BEGIN only engages when Py_TYPE(op)->tp_dealloc is that
       very function), so provide one here to keep deep chains of objects from
       overflowing the C stack.  The trashcan needs an untracked GC object; skip
       it for types with finalizers (their dealloc may resurrect). */
    if (start == tp && tp->tp_dealloc == hooked_dealloc && PyType_IS_GC(tp)
        && tp->tp_finalize == NULL && tp->tp_del == NULL) {
        PyObject_GC_UnTrack(self);
        Py_TRASHCAN_BEGIN(self, hooked_dealloc)
        dealloc_top = &frame;
        e->orig_dealloc(self);
        dealloc_top = frame.prev;
        Py_TRASHCAN_END
    }
    else {
        dealloc_top = &frame;
        e->orig_dealloc(self);
        dealloc_top = frame.prev;
    }
}

static void
hooked_free(void *ptr)
{
    PyObject *self = (PyObject *)ptr;
    invalidate_address(self);
    for (PyTypeObject *t = Py_TYPE(self); t != NULL; t = t->tp_base) {
        HookedType *e = (HookedType *)ptrmap_get(&hooked_types, t);
        if (e != NULL && e->orig_free != NULL) {
            e->orig_free(ptr);
            return;
        }
    }
    Py_FatalError("rawref: hooked tp_free called but no original tp_free is known");
}

static HookedType *
get_or_add_entry(PyTypeObject *t)
{
    HookedType *e = (HookedType *)ptrmap_get(&hooked_types, t);
    if (e != NULL) {
        return e;
    }
    e = (HookedType *)PyMem_Calloc(1, sizeof(HookedType));
    if (e == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (ptrmap_set(&hooked_types, t, e) < 0) {
        PyMem_Free(e);
        PyErr_NoMemory();
        return NULL;
    }
    Py_INCREF(t); /* never released: the pointer must stay unique */
    e->type = t;
    return e;
}

/* Make sure the death of any instance of `tp` invalidates its refs. */
static int
ensure_hooked(PyTypeObject *tp)
{
    /* The type whose tp_dealloc runs: subtype_dealloc walks tp_base to the
       first base whose slot differs and calls that one. */
    PyTypeObject *owner = tp;
    while (owner->tp_dealloc == subtype_dealloc_ptr && owner->tp_base != NULL) {
        owner = owner->tp_base;
    }
    if (owner->tp_dealloc == hooked_dealloc) {
        return 0; /* hooked (directly or by inheritance from a hooked base) */
    }
    if (owner->tp_dealloc == subtype_dealloc_ptr) {
        PyErr_Format(PyExc_TypeError, "rawref.ref: cannot determine the deallocator of '%.200s'",
                     tp->tp_name);
        return -1;
    }
    if (owner->tp_flags & Py_TPFLAGS_HEAPTYPE) {
        HookedType *e = get_or_add_entry(owner);
        if (e == NULL) {
            return -1;
        }
        assert(e->orig_dealloc == NULL);
        e->orig_dealloc = owner->tp_dealloc;
        owner->tp_dealloc = hooked_dealloc;
        return 0;
    }
    /* The deallocator belongs to a static type: hook tp_free of the heap type
       of the instance instead. */
    if (!(tp->tp_flags & Py_TPFLAGS_HEAPTYPE)) {
        PyErr_Format(PyExc_TypeError,
                     "rawref.ref: cannot reference '%.200s' objects: static type without "
                     "weak reference support",
                     tp->tp_name);
        return -1;
    }
    if (tp->tp_free == hooked_free) {
        return 0;
    }
    if (tp->tp_free == NULL) {
        PyErr_Format(PyExc_TypeError, "rawref.ref: type '%.200s' has no tp_free", tp->tp_name);
        return -1;
    }
    HookedType *e = get_or_add_entry(tp);
    if (e == NULL) {
        return -1;
    }
    assert(e->orig_free == NULL);
    e->orig_free = tp->tp_free;
    tp->tp_free = hooked_free;
    return 0;
}

/* ---- construction ----------------------------------------------------- */

static PyObject *ref_vectorcall_call(PyObject *self, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames);

static PyObject *
ref_make(PyTypeObject *type, PyObject *obj)
{
    PyTypeObject *tp = Py_TYPE(obj);
    if (Py_REFCNT(obj) <= 0) {
        PyErr_SetString(PyExc_ValueError, "rawref.ref: object is being deallocated");
        return NULL;
    }
    if (tp->tp_weaklistoffset != 0) {
        PyObject *wr = PyWeakref_NewRef(obj, NULL);
        if (wr == NULL) {
            return NULL;
        }
        RefObject *r = PyObject_New(RefObject, type);
        if (r == NULL) {
            Py_DECREF(wr);
            return NULL;
        }
        r->vectorcall = ref_vectorcall_call;
        r->target = NULL;
        r->wr = wr;
        r->addr = (uintptr_t)obj;
        return (PyObject *)r;
    }
    RefObject *existing = (RefObject *)ptrmap_get(&registry, obj);
    if (existing != NULL) {
        assert(existing->target == obj);
        Py_INCREF(existing);
        return (PyObject *)existing;
    }
    if (ensure_hooked(tp) < 0) {
        return NULL;
    }
    RefObject *r = PyObject_New(RefObject, type);
    if (r == NULL) {
        return NULL;
    }
    r->vectorcall = ref_vectorcall_call;
    r->target = NULL;
    r->wr = NULL;
    r->addr = (uintptr_t)obj;
    if (ptrmap_set(&registry, obj, r) < 0) {
        Py_DECREF(r);
        return PyErr_NoMemory();
    }
    r->target = obj;
    return (PyObject *)r;
}

static PyObject *
ref_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "rawref.ref() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "ref", 1, 1, &obj)) {
        return NULL;
    }
    return ref_make(type, obj);
}

/* type-level vectorcall: fast path for rawref.ref(obj) */
static PyObject *
ref_type_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
        PyErr_SetString(PyExc_TypeError, "rawref.ref() takes no keyword arguments");
        return NULL;
    }
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "rawref.ref() takes exactly one argument (%zd given)",
                     nargs);
        return NULL;
    }
    return ref_make((PyTypeObject *)type, args[0]);
}

static void
ref_dealloc(RefObject *self)
{
    if (self->target != NULL) {
        void *v = ptrmap_pop(&registry, self->target);
        (void)v;
        assert(v == (void *)self);
        self->target = NULL;
    }
    Py_CLEAR(self->wr);
    PyObject_Free(self);
}

/* ---- behaviour ------------------------------------------------------------ */

static PyObject *
ref_vectorcall_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    (void)args;
    if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "rawref.ref.__call__() takes no arguments");
        return NULL;
    }
    PyObject *t = ref_get((RefObject *)self);
    if (t == NULL) {
        Py_RETURN_NONE;
    }
    Py_INCREF(t);
    return t;
}

static PyObject *
ref_is_alive(RefObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(ref_get(self) != NULL);
}

static int
ref_bool(RefObject *self)
{
    return ref_get(self) != NULL;
}

static Py_hash_t
ref_hash(RefObject *self)
{
    Py_hash_t h = (Py_hash_t)(self->addr >> 4) ^ (Py_hash_t)(self->addr << (8 * sizeof(void *) - 4));
    if (h == -1) {
        h = -2;
    }
    return h;
}

static PyObject *
ref_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, &RefType)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    int eq;
    if (a == b) {
        eq = 1;
    }
    else {
        PyObject *ta = ref_get((RefObject *)a);
        PyObject *tb = ref_get((RefObject *)b);
        eq = ta != NULL && ta == tb;
    }
    if (op == Py_NE) {
        eq = !eq;
    }
    return PyBool_FromLong(eq);
}

static PyObject *
ref_repr(RefObject *self)
{
    PyObject *t = ref_get(self);
    if (t == NULL) {
        return PyUnicode_FromFormat("<rawref.ref at %p; dead>", (void *)self);
    }
    return PyUnicode_FromFormat("<rawref.ref at %p; to '%.200s' at %p>", (void *)self,
                                Py_TYPE(t)->tp_name, (void *)t);
}

static PyMethodDef ref_methods[] = {
    {"is_alive", (PyCFunction)ref_is_alive, METH_NOARGS,
     "True while the referenced object is alive."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "See PEP 585 (rawref.ref[T] in annotations)."},
    {NULL, NULL, 0, NULL},
};

static PyNumberMethods ref_as_number = {
    .nb_bool = (inquiry)ref_bool,
};

PyDoc_STRVAR(ref_doc,
             "ref(obj, /)\n--\n\n"
             "Non-owning reference to obj.  Calling it returns obj while obj is alive and\n"
             "None after obj has been deallocated; it never returns a freed object.\n"
             "Works for objects whose type does not support weak references (mypyc\n"
             "native classes, __slots__ classes).  ref(obj) returns the same ref object\n"
             "for the same live target when the target does not support weakrefs.");

static PyTypeObject RefType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rawref.ref",
    .tp_basicsize = sizeof(RefObject),
    .tp_itemsize = 0,
    .tp_dealloc = (destructor)ref_dealloc,
    .tp_vectorcall_offset = offsetof(RefObject, vectorcall),
    .tp_repr = (reprfunc)ref_repr,
    .tp_as_number = &ref_as_number,
    .tp_hash = (hashfunc)ref_hash,
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = ref_doc,
    .tp_richcompare = ref_richcompare,
    .tp_methods = ref_methods,
    .tp_new = ref_new,
    .tp_vectorcall = ref_type_vectorcall,
};

/* ------------------------------------------------------------------------ */
/* Module-level helpers (diagnostics, used by the tests)                      */
/* ------------------------------------------------------------------------ */

static PyObject *
mod_registry_size(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(registry.used);
}

static PyObject *
mod_hooked_types(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(0);
    if (list == NULL || hooked_types.slots == NULL) {
        return list;
    }
    for (size_t i = 0; i <= hooked_types.mask; i++) {
        HookedType *e = (HookedType *)hooked_types.slots[i].value;
        if (hooked_types.slots[i].key == NULL) {
            continue;
        }
        const char *how = e->orig_dealloc != NULL ? (e->orig_free != NULL ? "both" : "tp_dealloc")
                                                  : "tp_free";
        PyObject *item = Py_BuildValue("(Os)", (PyObject *)e->type, how);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

/* Consistency check of the registry: every entry maps a live object to a ref
   that points back at it.  Raises AssertionError on inconsistency. */
static PyObject *
mod_check_registry(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    size_t count = 0;
    if (registry.slots != NULL) {
        for (size_t i = 0; i <= registry.mask; i++) {
            PyObject *key = (PyObject *)registry.slots[i].key;
            if (key == NULL) {
                continue;
            }
            count++;
            RefObject *r = (RefObject *)registry.slots[i].value;
            if (r == NULL || Py_TYPE(r) != &RefType || r->target != key || Py_REFCNT(r) <= 0) {
                PyErr_SetString(PyExc_AssertionError, "rawref registry: entry/ref mismatch");
                return NULL;
            }
            if (Py_REFCNT(key) <= 0) {
                PyErr_SetString(PyExc_AssertionError, "rawref registry: dead target registered");
                return NULL;
            }
            if (ptrmap_get(&registry, key) != r) {
                PyErr_SetString(PyExc_AssertionError, "rawref registry: probe chain broken");
                return NULL;
            }
        }
    }
    if (count != registry.used) {
        PyErr_SetString(PyExc_AssertionError, "rawref registry: count mismatch");
        return NULL;
    }
    return PyLong_FromSize_t(count);
}

static PyMethodDef module_methods[] = {
    {"_registry_size", mod_registry_size, METH_NOARGS,
     "Number of live targets referenced through the hook registry."},
    {"_hooked_types", mod_hooked_types, METH_NOARGS,
     "List of (type, 'tp_dealloc'|'tp_free'|'both') hooked so far."},
    {"_check_registry", mod_check_registry, METH_NOARGS,
     "Verify registry consistency; returns the number of entries."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef rawref_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rawref._rawref",
    .m_doc = "Non-owning references usable with objects that do not support weakrefs.",
    .m_size = -1,
    .m_methods = module_methods,
};

/* Find CPython's (static, unexported) subtype_dealloc by creating a probe
   Python class. */
static int
find_subtype_dealloc(void)
{
    PyObject *probe = PyObject_CallFunction((PyObject *)&PyType_Type, "s(){s:()}",
                                            "_rawref_probe", "__slots__");
    if (probe == NULL) {
        return -1;
    }
    subtype_dealloc_ptr = ((PyTypeObject *)probe)->tp_dealloc;
    Py_DECREF(probe);
    if (subtype_dealloc_ptr == NULL || subtype_dealloc_ptr == PyBaseObject_Type.tp_dealloc) {
        PyErr_SetString(PyExc_ImportError, "rawref: cannot locate subtype_dealloc");
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__rawref(void)
{
    if (subtype_dealloc_ptr == NULL && find_subtype_dealloc() < 0) {
        return NULL;
    }
    if (PyType_Ready(&RefType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&rawref_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&RefType);
    if (PyModule_AddObject(m, "ref", (PyObject *)&RefType) < 0) {
        Py_DECREF(&RefType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
