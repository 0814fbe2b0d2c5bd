/*
 * trunkguard.so: store-write fault drills (docs/kamailio.md, "Drills").
 *
 * With modparam("trunkguard", "drills", 1) and an htable `tgctl` (kamailio.cfg's
 * TG_DRILLS), `kamcmd htable.seti tgctl fail_write N` makes the N-th write of the
 * state table from then on, in whichever process makes it, fail as Kamailio fails one
 * (-1, nothing written; the database's write before it rolled back or put back): the
 * KEMI shim's drill (trunkguard_kemi.py, _drilled, around sht_sets), so that
 * tests/kamailio/test_kamailio.py's StoreWriteDrill runs against either. htable's API
 * has no atomic decrement (ht_api.h), so a lock of the module orders the drill's own
 * read and write of the count across processes. Off, the default, no drill code runs.
 */
#include "../../core/dprint.h"
#include "../../core/mem/mem.h"

#include "tg_mod.h"

#include "../htable/api.h"

int tg_drills = 0;

static htable_api_t tg_drill_htb;
static gen_lock_t *tg_drill_lock = NULL;
static str tg_drill_table = str_init("tgctl");
static str tg_drill_item = str_init("fail_write");

/* mod_init. */
int tg_drill_init(void)
{
	if(!tg_drills)
		return 0;
	if(htable_load_api(&tg_drill_htb) < 0)
		return -1;
	tg_drill_lock = lock_alloc();
	if(tg_drill_lock == NULL || lock_init(tg_drill_lock) == NULL) {
		LM_ERR("cannot make the drill's lock\n");
		return -1;
	}
	LM_WARN("trunkguard: drills enabled (tgctl fail_write): a test or fire-drill "
			"setting, never a production one\n");
	return 0;
}

/* 1 when this store write is the one the count brings to 0: the caller refuses it. */
int tg_drill_refuses(str *key)
{
	ht_cell_t *cell;
	int_str v;
	long left;

	if(!tg_drills)
		return 0;
	lock_get(tg_drill_lock);
	cell = tg_drill_htb.get_clone(&tg_drill_table, &tg_drill_item);
	if(cell == NULL || (cell->flags & AVP_VAL_STR) || cell->value.n <= 0) {
		lock_release(tg_drill_lock);
		if(cell != NULL)
			pkg_free(cell);
		return 0;
	}
	left = cell->value.n - 1;
	pkg_free(cell);
	v.n = left;
	tg_drill_htb.set(&tg_drill_table, &tg_drill_item, 0, &v, 1);
	lock_release(tg_drill_lock);
	if(left != 0)
		return 0;
	LM_WARN("trunkguard: drill: refused the store write of %.*s (tgctl fail_write)\n",
			key->len, key->s);
	return 1;
}
